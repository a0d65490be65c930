//! The journey of a request, as one tower stack: `stack` puts the layers of the rooms below in
//! their order and says why each stands where it does. It holds no layer of its own.
//!
//! It stands above `state` (the stack runs over a `Generation`) and every layer's room, and below
//! `listen`, which builds one stack per connection and hands it to `serve_http`.

pub mod stack;
