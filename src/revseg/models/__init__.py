"""revseg.models"""
