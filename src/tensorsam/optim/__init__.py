"""tensorsam.optim"""
