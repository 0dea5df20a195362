"""MU-LLaMA's two training stages: typed recipe configs, MusicQA data, the MERT feature cache, the recipes
themselves and the command that launches them.
"""
