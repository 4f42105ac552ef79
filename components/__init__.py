"""UI pieces of the AGACC app: controls, Plotly figure builders, the token view, the layout.

Everything here draws what the library (``agacc``) recorded; nothing computes compression."""
