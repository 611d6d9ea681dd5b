"""revseg.memory"""
