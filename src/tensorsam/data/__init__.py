"""tensorsam.data"""
