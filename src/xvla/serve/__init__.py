"""xvla.serve"""
