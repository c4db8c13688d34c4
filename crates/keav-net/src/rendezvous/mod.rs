//! Rendezvous: devices register their identifier and address; others look them up and then
//! connect directly. (being written)
