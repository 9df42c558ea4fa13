"""The shared trainer behind train-tokenizer, train-discrete and train-continuous (trainer.py), the training
settings and batch checks (config.py), what a training step costs (cost.py), and what the two stage tasks
share (stage.py). It sits below every model that trains with it and imports none of them."""
