"""Thin HTTP handlers: parse the request, call the core, shape the response."""
