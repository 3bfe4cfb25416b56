"""apps/data"""
