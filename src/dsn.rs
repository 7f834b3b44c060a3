//! Delivery status notifications (RFC 3464): failure and delay notices, sent from the null sender.
