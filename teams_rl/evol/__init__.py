"""Instruction evolution: seeds, operators, policy rollouts, rewards, filters and the generated dataset."""
