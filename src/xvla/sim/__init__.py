"""xvla.sim"""
