"""Image registration: classical (SimpleITK), learned (VoxelMorph-style), quality metrics, atlases.

Every method returns an ITK transform mapping fixed-image points to moving-image
points; :func:`medseg.registration.fields.warp_image` and
:func:`~medseg.registration.fields.warp_labels` resample the moving image and its
labels on the fixed grid through it.
"""
