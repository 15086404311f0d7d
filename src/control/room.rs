//! `$join` → `$joined` and `$leave` → `$left`: rooms, which events can name to reach
//! only their members.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{reply, Request};
use crate::event::RoomName;
use crate::protocol::ProtocolError;

#[derive(Deserialize, Serialize)]
struct Room {
    room: String,
}

pub(super) fn join(request: &Request<'_>) -> Result<Bytes, ProtocolError> {
    let wanted: Room = request.payload()?;
    let room = RoomName::new(wanted.room.as_str())?;
    if let Some(permissions) = request.client.access.permissions() {
        if !permissions.rooms.allows(room.as_str()) {
            return Err(super::denied(format!(
                "joining room {}",
                crate::protocol::excerpt(room.as_str())
            )));
        }
    }
    request.hub.join_room(request.client.id, &room)?;
    reply("$joined", &wanted)
}

pub(super) fn leave(request: &Request<'_>) -> Result<Bytes, ProtocolError> {
    let unwanted: Room = request.payload()?;
    let room = RoomName::new(unwanted.room.as_str())?;
    request.hub.leave_room(request.client.id, &room);
    reply("$left", &unwanted)
}
