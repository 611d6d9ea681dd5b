"""revseg.data"""
