"""revseg.nn"""
