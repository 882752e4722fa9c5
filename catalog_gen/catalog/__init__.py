"""Stage 1, the catalogue: the class map, photo intake, the taxonomy of class / instance sets,
rare identifier tokens, and the built-in sample catalogue.
"""
