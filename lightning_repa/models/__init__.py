"""Model adapters: what the package knows about diffusers denoisers. Families as data
(`families`: block lists, token layout, grid), where image tokens sit in a block's stream
(`selectors`), forward hooks that capture them (`capture`), and finding, unwrapping and
temporarily wrapping the user's modules (`surgery`). May import: choices, maths. No Lightning."""
