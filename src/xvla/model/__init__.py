"""xvla.model"""
