"""The bridge's parts (b24_ol_bridge.py is their thin main); see README "How it works" for the map."""
