"""The model: towers, DAT's losses and the tfrs.Model that joins them."""
