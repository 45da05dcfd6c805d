"""Label Studio ML backend for Segment Anything: the HTTP protocol, prompts, masks and task images."""
