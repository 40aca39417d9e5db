#!/bin/sh
# A test PKI shaped like AMD's SEV-SNP PKI, made with the openssl CLI (RSASSA-PSS SHA-384,
# salt 48, as AMD signs): ARK (self-signed), ASK and ASVK signed by it, a VCEK (P-384) signed
# by the ASK carrying the AMD TCB extensions, hwID and productName of the shared test report,
# and CRLs signed by the ARK. Also a second ARK of the same name (a forger's) and a CRL it
# signed. Run by tests/common/amd_pki.rs at test time:
#   amd_pki.sh OUT_DIR CHIP_ID_HEX BL TEE SNP UCODE
set -eu
out=$1 chip=$2 bl=$3 tee=$4 snp=$5 ucode=$6
cd "$out"
PSS="-sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:48 -sigopt rsa_mgf1_md:sha384"
int() { printf 'DER:02:01:%02x' "$1"; }
hwid=$(printf '%s' "$chip" | sed 's/../&:/g; s/:$//')
cat > ext.cnf <<X
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
[vcek]
basicConstraints = critical,CA:FALSE
1.3.6.1.4.1.3704.1.2 = ASN1:IA5STRING:Milan-B0
1.3.6.1.4.1.3704.1.3.1 = $(int "$bl")
1.3.6.1.4.1.3704.1.3.2 = $(int "$tee")
1.3.6.1.4.1.3704.1.3.3 = $(int "$snp")
1.3.6.1.4.1.3704.1.3.8 = $(int "$ucode")
1.3.6.1.4.1.3704.1.4 = DER:04:40:$hwid
X
ark() {
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.pem" \
        -subj "/O=Tether test AMD PKI/CN=ARK-Milan" -days 9000 -sha384 $PSS \
        -set_serial 0x41524b -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}
ark ark
ark forger
issue() { # name cn serial issuer extensions key-options
    openssl req -new $6 -nodes -keyout "$1.key" -out "$1.csr" \
        -subj "/O=Tether test AMD PKI/CN=$2" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA "$4.pem" -CAkey "$4.key" -set_serial "$3" -days 8000 \
        -sha384 $PSS -extfile ext.cnf -extensions "$5" -out "$1.pem" 2>/dev/null
}
issue ask SEV-Milan 0x41534b ark ca "-newkey rsa:2048"
issue asvk SEV-VLEK-Milan 0x415356 ark ca "-newkey rsa:2048"
issue vcek SEV-VCEK 0x56434b ask vcek "-newkey ec -pkeyopt ec_paramgen_curve:secp384r1"
openssl pkcs8 -topk8 -nocrypt -in vcek.key -outform DER -out vcek.pk8
crl() { # name signer serials...
    name=$1 signer=$2
    shift 2
    : > index.txt
    for s in "$@"; do
        printf 'R\t491231235959Z\t210101000000Z,keyCompromise\t%s\tunknown\t/CN=x\n' "$s" >> index.txt
    done
    printf '[ca]\ndefault_ca = amd\n[amd]\ndatabase = index.txt\ncrlnumber = crlnumber\ndefault_md = sha384\ndefault_crl_days = 3650\n' > ca.cnf
    echo 01 > crlnumber
    openssl ca -gencrl -config ca.cnf -keyfile "$signer.key" -cert "$signer.pem" $PSS \
        -out "$name.pem" 2>/dev/null
    openssl crl -in "$name.pem" -outform DER -out "$name.crl"
}
crl crl-none ark 0A
crl crl-vcek ark 56434B
crl crl-ask ark 41534B
crl crl-forged forger 0A
