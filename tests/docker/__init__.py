"""Docker mode against a real engine and the local test images (marked ``docker``)."""
