"""Training data: record formats (``formats``), sources and mixtures (``sources``), encoding and batching
(``dataset``)."""
