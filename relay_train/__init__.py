"""Terminus Relay's trainer: SD3.5 Medium + LyCORIS LoKr on an int8 (quanto) base. Knows nothing of Ray."""
