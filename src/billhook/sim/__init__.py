"""`billhook simulate`: a hostile fake billing provider, and the checker that judges a receiver."""
