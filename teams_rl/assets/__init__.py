"""Small files shipped with the package: the tiny test tokenizer and the task/seed data of the offline default."""
