//! The journey of a request, as one tower stack: `stack` puts the layers of the rooms below in
//! their order and says why each stands where it does.

pub mod stack;
