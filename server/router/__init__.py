"""``spindle router``: the data-parallel front that spreads requests over Spindle replicas.

``pool`` (replica health and load, polled), ``policy`` (which replica, in which order), ``proxy`` (forwarding with
retries before a response starts, byte-for-byte relay after), ``app`` (the FastAPI app and its start-up).
"""
