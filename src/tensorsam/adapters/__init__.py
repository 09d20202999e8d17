"""tensorsam.adapters"""
