// An independent JOSE implementation (panva/jose) on the other end of Tether's JWEs, for
// tests/tests/crypto_interop.rs. One request as JSON on stdin, one answer as JSON on stdout:
//
//   seal   {"key": <TEE public key JWK>, "plaintext": b64url}        -> flattened JWE
//   seal   {"dir": b64url 32-byte key, "plaintext": b64url}           -> flattened JWE (alg dir)
//   open   {"pkcs8": PEM, "alg": JWA name, "jwe": flattened JWE}      -> {"plaintext", "header"}
//   open   {"dir": b64url 32-byte key, "jwe": flattened JWE}          -> {"plaintext", "header"}
//   golden {"recipient": public JWK, "epk": private JWK, "cek": b64url, "iv": b64url,
//           "plaintext": b64url}                                      -> flattened JWE made with
//                                                                       a fixed ephemeral key
import * as jose from 'jose';
import { readFileSync } from 'node:fs';

const ENC = 'A256GCM';
const bytes = (b64url) => new Uint8Array(Buffer.from(b64url, 'base64url'));
const b64url = (u8) => Buffer.from(u8).toString('base64url');

async function seal(req) {
  const plaintext = bytes(req.plaintext);
  if (req.dir !== undefined) {
    return new jose.FlattenedEncrypt(plaintext)
      .setProtectedHeader({ alg: 'dir', enc: ENC })
      .encrypt(bytes(req.dir));
  }
  const alg = req.key.alg;
  const key = await jose.importJWK(req.key, alg);
  return new jose.FlattenedEncrypt(plaintext).setProtectedHeader({ alg, enc: ENC }).encrypt(key);
}

async function open(req) {
  const key = req.dir !== undefined ? bytes(req.dir) : await jose.importPKCS8(req.pkcs8, req.alg);
  const { plaintext, protectedHeader } = await jose.flattenedDecrypt(req.jwe, key, {
    keyManagementAlgorithms: ['ECDH-ES+A256KW', 'RSA-OAEP-256', 'dir'],
    contentEncryptionAlgorithms: [ENC],
  });
  return { plaintext: b64url(plaintext), header: protectedHeader };
}

async function golden(req) {
  const recipient = await jose.importJWK(req.recipient, 'ECDH-ES+A256KW');
  const epk = await jose.importJWK(req.epk, 'ECDH-ES+A256KW', { extractable: true });
  return new jose.FlattenedEncrypt(bytes(req.plaintext))
    .setProtectedHeader({ alg: 'ECDH-ES+A256KW', enc: ENC })
    .setKeyManagementParameters({ epk })
    .setContentEncryptionKey(bytes(req.cek))
    .setInitializationVector(bytes(req.iv))
    .encrypt(recipient);
}

const commands = { seal, open, golden };
const command = commands[process.argv[2]];
if (!command) {
  console.error(`usage: node interop.mjs (${Object.keys(commands).join('|')}) < request.json`);
  process.exit(2);
}
const request = JSON.parse(readFileSync(0, 'utf8'));
process.stdout.write(JSON.stringify(await command(request)));
