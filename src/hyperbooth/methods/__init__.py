"""The personalization methods: hypernetworks that turn reference images into LoRAWeights."""
