"""xvla.train"""
