"""Hosts: the only code that knows where it runs (the A1111 WebUI, Forge, or standalone)."""
