"""The local stack: the six real servers Sealstream runs and is tested against, on 127.0.0.1."""
