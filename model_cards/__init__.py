"""model_cards."""
