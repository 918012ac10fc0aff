"""xvla.data"""
