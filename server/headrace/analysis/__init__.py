"""What the captures are for: backtests of candidate models, shadow traffic, drift."""
