"""The model: loading, layer capture, receptive fields, shared instrumentation, the device."""
