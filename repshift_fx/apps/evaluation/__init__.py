"""apps/evaluation"""
