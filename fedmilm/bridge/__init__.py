"""The HTTP(S) bridge: phones that speak only HTTP (the Android app, the Python reference phone)
join a Flower federation through it (PROTOCOL.md)."""
