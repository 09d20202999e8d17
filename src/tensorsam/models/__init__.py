"""tensorsam.models"""
