"""Workers: what a worker does, the pools and the factory process that run them, the transport back."""
