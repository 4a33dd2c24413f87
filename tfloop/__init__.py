"""tfloop: hand-written TensorFlow 2 training loops with trustworthy batch norm."""
