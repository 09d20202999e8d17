"""tensorsam.tasks"""
