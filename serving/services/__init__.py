"""gRPC handlers: the domain API (classifier), KServe v2 (inference, codecs), health; shared plumbing in base."""
