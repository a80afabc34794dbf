"""What subscribers get: live fan-out, filters, the SSE feed and the web page."""
