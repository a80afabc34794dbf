"""What stands between the network and the app: the server and its request guard."""
