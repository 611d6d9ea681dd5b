"""revseg.training"""
