"""Adapters: build DEQ fusion for one upstream codebase and return what its code expects."""
