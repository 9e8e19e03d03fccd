// push.js as an ES module:  import {PushClient} from '/push.mjs';
//
// push.js is a classic script (a module cannot also be a <script> without
// type="module"), so this file imports it for its side effect, which defines
// globalThis.PushClient, and re-exports that class. One implementation, two
// ways to load it.
import './push.js';

export const PushClient = globalThis.PushClient;
export default PushClient;
