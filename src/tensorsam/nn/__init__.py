"""tensorsam.nn"""
